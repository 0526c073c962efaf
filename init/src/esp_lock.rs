//! One program at a time changes the deployments on an ESP.
//!
//! `layerboot deploy`, `rollback`, `gc`, `bless` and the boot's own bless service
//! (`layerboot-init --bless`) each read the entries or the grubenv, decide, then write:
//! two at once (a fleet agent's deploy while the boot is being blessed, say) would each
//! decide from what the other is changing, and could give two entries one serial or put
//! back a grubenv without the other's verdict. Each takes an exclusive `flock` on the
//! ESP's root directory first. flock is the kernel's, on any filesystem (FAT included,
//! and a second mount of the same device locks the same inode), and goes with the
//! process: a command killed or cut by a power loss leaves no lock behind.

use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg, OFlag};

use crate::error::{Error, OsCause, Result};

/// Held while the program changes the ESP; dropping it releases the lock.
pub struct EspLock {
    _lock: Flock<File>,
}

/// Waits for any other program changing the deployments on `esp`, saying so on standard
/// error, then holds it. `patience`: how long to wait before giving up; `None`, for as
/// long as it takes (a person can interrupt a command).
pub fn lock(esp: &Path, patience: Option<Duration>) -> Result<EspLock> {
    let dir = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(OFlag::O_DIRECTORY.bits())
        .open(esp)
        .map_err(|e| {
            let fix = match e.errno() {
                Some(Errno::ENOENT) => "mount it there, or pass --esp with its mount point",
                Some(Errno::ENOTDIR) => "pass --esp with the directory the ESP is mounted on",
                Some(Errno::EACCES) => "run as root",
                _ => "check that the ESP is mounted and readable",
            };
            Error::new(format!("cannot open the ESP {}: {e} (fix: {fix})", esp.display()))
                .with_errno(e.errno())
                .with_path(esp)
        })?;
    let cannot = |e: Errno| {
        Error::new(format!(
            "cannot lock the ESP {}: {e} (fix: use a local filesystem that supports flock)",
            esp.display()
        ))
        .with_errno(Some(e))
        .with_path(esp)
    };
    let mut dir = match Flock::lock(dir, FlockArg::LockExclusiveNonblock) {
        Ok(held) => return Ok(EspLock { _lock: held }),
        Err((dir, Errno::EWOULDBLOCK)) => dir,
        Err((_, e)) => return Err(cannot(e)),
    };
    eprintln!(
        "layerboot: waiting for another layerboot program that is changing the deployments on {} to finish",
        esp.display()
    );
    let Some(patience) = patience else {
        return Flock::lock(dir, FlockArg::LockExclusive)
            .map(|held| EspLock { _lock: held })
            .map_err(|(_, e)| cannot(e));
    };
    let start = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(100));
        dir = match Flock::lock(dir, FlockArg::LockExclusiveNonblock) {
            Ok(held) => return Ok(EspLock { _lock: held }),
            Err((dir, Errno::EWOULDBLOCK)) if start.elapsed() < patience => dir,
            Err((_, Errno::EWOULDBLOCK)) => {
                return Err(Error::new(format!(
                    "another layerboot program has been changing the deployments on {} for {} s: gave up \
                     (fix: see what `layerboot` process runs, e.g. with `ps -C layerboot`)",
                    esp.display(),
                    patience.as_secs()
                ))
                .with_path(esp))
            }
            Err((_, e)) => return Err(cannot(e)),
        };
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[test]
    fn a_held_esp_is_waited_for_then_given_up_on_with_its_name() {
        let t = tempfile::tempdir().unwrap();
        let held = super::lock(t.path(), None).unwrap();
        // Another open file description, as another process has: it must wait.
        let e = super::lock(t.path(), Some(Duration::from_millis(300)))
            .err()
            .expect("it waited");
        assert!(e.to_string().contains("gave up") && e.to_string().contains(&t.path().display().to_string()));
        drop(held);
        super::lock(t.path(), Some(Duration::ZERO)).expect("free once released");
    }

    #[test]
    fn an_esp_that_is_not_a_directory_is_named_with_the_fix() {
        let t = tempfile::tempdir().unwrap();
        let file = t.path().join("esp");
        std::fs::write(&file, "").unwrap();
        for (path, fix) in [
            (file, "directory the ESP is mounted on"),
            (t.path().join("gone"), "mount it there"),
        ] {
            let e = super::lock(&path, None).err().unwrap().to_string();
            assert!(e.contains("cannot open the ESP") && e.contains(fix), "{e}");
        }
    }
}
